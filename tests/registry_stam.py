"""Contract-registry entries for STAM and STAMLite: faithful and improved beta1."""

import stax
from tests.registry import ROW_VIEW_DEPENDENT, Entry

_LITE_STATIC = ("beta1_update_interval",)

ENTRIES = [
    Entry("stam", stax.stam, dict(learning_rate=3e-2, weight_decay=0.0)),
    Entry("stam_snr", stax.stam, dict(learning_rate=3e-2, weight_decay=0.0, beta1_signal="snr")),
    Entry("stam_factored", stax.stam, dict(learning_rate=3e-2, weight_decay=0.0, codec="factored",
                                           min_compress_elements=64),
          static_args=("codec", "min_compress_elements"), **ROW_VIEW_DEPENDENT),
    Entry("stam_lite", stax.stam_lite, dict(learning_rate=3e-2, weight_decay=0.0),
          static_args=_LITE_STATIC),
    Entry("stam_lite_snr", stax.stam_lite,
          dict(learning_rate=3e-2, weight_decay=0.0, beta1_signal="snr"),
          static_args=_LITE_STATIC),
]
