"""stax: JAX-first modern deep-learning optimizers as pure optax transformations.

The flat public API: optimizers, building-block transforms, partition helpers and codecs.
"""

from stax import partition

# Optimizers (one module per seed).
from stax.optimizers.adamw import adamw
from stax.optimizers.oadamw import oadamw, oadamw_labels, stable_adamw
from stax.optimizers.scao import scao, scao_diagnostics
from stax.optimizers.stac import stac, stac_labels
from stax.optimizers.stam import stam, stam_beta1, stam_lite
from stax.optimizers.turbo_adam import turbo_adam

# Building-block transforms.
from stax.transforms.adam import (Beta1Rule, ScaleByAdamState, adam_moments, debias_beta,
                                  scale_by_adam)
from stax.transforms.adaptive_beta import (residual_variance_beta1, snr_beta1,
                                           spatial_variance_beta1)
from stax.transforms.guards import (NonFiniteGuardState, all_finite, gate_state, gated_chain,
                                   gated_partition, nonfinite_guard, zero_nonfinite)
from stax.transforms.kahan import KahanState, kahan_summation
from stax.transforms.kron import ScaleByKronState, scale_by_kron_lowrank, scale_by_kron_scao
from stax.transforms.orthogonalize import (NS_PRESETS, MatrixDimensionNumbers,
                                           ScaleByOrthogonalizationState, conv_dimension_numbers,
                                           ns_coefficients, orthogonalize, orthogonalize_many,
                                           scale_by_orthogonalization, singular_value_band)
from stax.transforms.stable import add_decoupled_weight_decay, scale_by_stable_adam
from stax.transforms.trace import StoredTraceState, saturating_trace, stored_trace

# Kernels (each beside its jax.numpy reference).
from stax.kernels.newton_schulz import newton_schulz

# Which leaf gets what.
from stax.describe import Description, LeafReport, describe

# Partition helpers.
from stax.partition import (execution_order, is_embedding_path, is_output_head_path,
                            last_n_modules_labels, leaf_names, matrix_labels, module_name,
                            natural_order, normalize_path, path_name)

# Codecs: how a moment is stored.
from stax.codecs.accounting import state_bits_per_param
from stax.codecs.base import (FullPrecision, MomentCodec, MomentStorage, SeparateStorage,
                              StorageBase, StorageStep, full_precision_storage)
from stax.codecs.block_signed import BlockSignedCodec
from stax.codecs.log_quant import LogQuantCodec
from stax.codecs.tensor_rms import TensorMean, tensor_rms_storage
from stax.codecs.turbo import STATE_CODECS, TurboAdam02Storage, state_codec_storage

# Compiling a step.
from stax.compile_options import (HUGE_PAGE_MALLOC, LEAN_MEMORY_FLAG, huge_page_malloc_active,
                                  huge_page_malloc_env, lean_memory_xla_flags,
                                  reuse_cpu_temporaries)

__version__ = "0.1.0"

#: The public API (what ``from stax import *`` gives); every name has a docstring.
__all__ = [
    "partition",
    "adamw",
    "oadamw",
    "oadamw_labels",
    "stable_adamw",
    "scao",
    "scao_diagnostics",
    "stac",
    "stac_labels",
    "stam",
    "stam_beta1",
    "stam_lite",
    "turbo_adam",
    "Beta1Rule",
    "ScaleByAdamState",
    "adam_moments",
    "debias_beta",
    "scale_by_adam",
    "residual_variance_beta1",
    "snr_beta1",
    "spatial_variance_beta1",
    "NonFiniteGuardState",
    "all_finite",
    "gate_state",
    "gated_chain",
    "gated_partition",
    "nonfinite_guard",
    "zero_nonfinite",
    "KahanState",
    "kahan_summation",
    "ScaleByKronState",
    "scale_by_kron_lowrank",
    "scale_by_kron_scao",
    "NS_PRESETS",
    "MatrixDimensionNumbers",
    "ScaleByOrthogonalizationState",
    "conv_dimension_numbers",
    "ns_coefficients",
    "orthogonalize",
    "orthogonalize_many",
    "scale_by_orthogonalization",
    "singular_value_band",
    "add_decoupled_weight_decay",
    "scale_by_stable_adam",
    "StoredTraceState",
    "saturating_trace",
    "stored_trace",
    "newton_schulz",
    "Description",
    "LeafReport",
    "describe",
    "execution_order",
    "is_embedding_path",
    "is_output_head_path",
    "last_n_modules_labels",
    "leaf_names",
    "matrix_labels",
    "module_name",
    "natural_order",
    "normalize_path",
    "path_name",
    "state_bits_per_param",
    "FullPrecision",
    "MomentCodec",
    "MomentStorage",
    "SeparateStorage",
    "StorageBase",
    "StorageStep",
    "full_precision_storage",
    "BlockSignedCodec",
    "LogQuantCodec",
    "TensorMean",
    "tensor_rms_storage",
    "STATE_CODECS",
    "TurboAdam02Storage",
    "state_codec_storage",
    "HUGE_PAGE_MALLOC",
    "LEAN_MEMORY_FLAG",
    "huge_page_malloc_active",
    "huge_page_malloc_env",
    "lean_memory_xla_flags",
    "reuse_cpu_temporaries",
]
