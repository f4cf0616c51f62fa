"""The provider's data sources, one module each (``data "trellis_<name>"``)."""

from trellis.terraform.data_sources.ca_roots import CARoots
from trellis.terraform.data_sources.intention_check import IntentionCheck
from trellis.terraform.data_sources.kv import KeyData, KeysData
from trellis.terraform.data_sources.service import ServiceData
from trellis.terraform.data_sources.services import ServicesData

DATA_SOURCES = (IntentionCheck, ServiceData, ServicesData, KeyData, KeysData, CARoots)
