"""The provider's data sources, one module each (``data "trellis_<name>"``)."""

from trellis.terraform.data_sources.ca_roots import CARoots
from trellis.terraform.data_sources.intention_check import IntentionCheck
from trellis.terraform.data_sources.kv import KeyData, KeysData

DATA_SOURCES = (IntentionCheck, KeyData, KeysData, CARoots)
