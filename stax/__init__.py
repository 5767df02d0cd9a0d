"""stax: JAX-first modern deep-learning optimizers as pure optax transformations.

The flat public API: optimizers, building-block transforms, partition helpers and codecs.
"""

from stax import partition
from stax.codecs.base import (FullPrecision, MomentCodec, MomentStorage, SeparateStorage,
                              full_precision_storage)
from stax.optimizers.adamw import adamw
from stax.optimizers.stac import stac, stac_labels
from stax.partition import (execution_order, is_embedding_path, is_output_head_path,
                            last_n_modules_labels, leaf_names, matrix_labels, module_name,
                            natural_order, normalize_path, path_name)
from stax.transforms.adam import Beta1Rule, ScaleByAdamState, adam_moments, debias_beta, scale_by_adam
from stax.transforms.guards import NonFiniteGuardState, all_finite, nonfinite_guard

__version__ = "0.1.0"
