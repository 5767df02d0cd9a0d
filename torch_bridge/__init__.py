"""torch_bridge: stax / optax transformations as ``torch.optim.Optimizer`` classes via DLPack.

``Optimizer(params, factory, **hyperparams)`` runs any transformation factory (``stax.adamw``,
``optax.lion``, ...) as a torch optimizer; the drop-in classes (``STAC``, ...) keep the seeds'
constructor names. See the README section "Using stax from PyTorch".
"""

from torch_bridge import convert
from torch_bridge.layout import ModuleLayout
from torch_bridge.optimizer import (Optimizer, prepare_for_gradient_release,
                                    remove_gradient_release, torch_dimension_numbers)
from torch_bridge.dropin import *  # noqa: F401,F403
from torch_bridge.dropin import __all__ as _dropin_all

__all__ = ["Optimizer", "ModuleLayout", "convert", "prepare_for_gradient_release",
           "remove_gradient_release", "torch_dimension_numbers"] + list(_dropin_all)
