"""``trellis terraform mirror DIR``: install the Terraform provider without a registry.

It writes the provider into the filesystem mirror ``DIR`` and prints, on stdout, the Terraform
CLI configuration that installs it from there (so ``trellis terraform mirror DIR > FILE`` and
``TF_CLI_CONFIG_FILE=FILE`` is the whole setup); what to put in a configuration goes to stderr.
The work is done by :mod:`trellis.terraform.mirror`; this module only parses the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trellis.api.cli.base import Command, CommandError, Context, Registry, exactly


def terraform_mirror(ctx: Context, ns: argparse.Namespace) -> int:
    from trellis.terraform import mirror

    exactly(ns.args, 1, "a mirror directory")
    directory = Path(ns.args[0])
    try:
        written = mirror.write_mirror(directory)
    except OSError as e:
        raise CommandError(f"Error writing the mirror in {directory}: {e}") from None
    ctx.out(mirror.cli_config(directory).rstrip("\n"))
    ctx.err(f"Wrote {written}")
    ctx.err("Save the configuration above to a file and export TF_CLI_CONFIG_FILE=<that file>;")
    ctx.err("then require the provider in your configuration with:\n")
    ctx.err(mirror.required_providers().rstrip("\n"))
    return 0


def register(r: Registry) -> None:
    r.group(("terraform",), "Install the Terraform provider")
    r.add(
        Command(
            ("terraform", "mirror"),
            "Writes the Terraform provider into a filesystem mirror",
            "trellis terraform mirror DIR",
            terraform_mirror,
            description="""
            Writes the Trellis Terraform provider into the filesystem mirror DIR (created if
            needed) and prints the Terraform CLI configuration that installs it from there,
            with no registry and no network access:

                $ trellis terraform mirror ~/.trellis/terraform > ~/.trellis/terraform.tfrc
                $ export TF_CLI_CONFIG_FILE=~/.trellis/terraform.tfrc
                $ terraform init

            See terraform/README.md.
            """,
            http=False,
        )
    )
