"""The provider's data sources, one module each (``data "trellis_<name>"``)."""

from trellis.terraform.data_sources.intention_check import IntentionCheck

DATA_SOURCES = (IntentionCheck,)
