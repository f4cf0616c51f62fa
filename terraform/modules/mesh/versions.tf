terraform {
  required_version = ">= 1.0.3"

  required_providers {
    trellis = {
      # The provider `trellis terraform mirror` installs (terraform/README.md).
      source  = "trellis.invalid/trellis/trellis"
      version = ">= 0.1.0"
    }
  }
}
