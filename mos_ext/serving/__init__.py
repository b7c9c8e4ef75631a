"""Multi-tenant serving: an adapter store and a mixed-batch model wrapper."""
from .model import MultiTenantLinear, MultiTenantModel
from .store import AdapterSpec, AdapterStore, CapacityError

__all__ = ["AdapterStore", "AdapterSpec", "CapacityError", "MultiTenantModel", "MultiTenantLinear"]
