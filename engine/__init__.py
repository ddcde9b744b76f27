"""LANCE Lab engine: exact compressed-activation fine-tuning (vanilla, gradient filter, HOSVD_ε, ASI, LANCE).

Public API::

    import engine
    names = engine.compressible_layers(model)                 # conv/linear layers, definition order
    handle = engine.compress_model(model, "asi", last_k=4)   # swap in compressed layers, freeze the rest
    with engine.SavedBytesMeter(model) as meter:              # measure what autograd saves
        loss = criterion(model(x), y)
    loss.backward()
    meter.layer_activation_bytes, meter.region_activation_bytes, handle.stats()
    engine.restore_model(model)                                # original layers back
    engine.pack_region(model) / engine.unpack_region(model)    # lossless packing of BN/ReLU/dropout/pool saves

Methods and their options: ``engine.METHODS`` / ``engine.method_options(name)``.
Never imports Streamlit.
"""
from engine.functional import (
    default_asi_ranks,
    hosvd,
    hosvd_ranks,
    tucker_bytes,
    tucker_elements,
    tucker_weight_grad,
    tucker_weight_grad_at_ranks,
)
from engine.layers import CompressedLayer
from engine.memory import SavedBytesMeter
from engine.methods import METHODS, make_method, method_options
from engine.packing import pack_region, unpack_region
from engine.surgery import (
    CompressionHandle,
    compress_model,
    compressible_layers,
    resolve_layers,
    restore_model,
    set_train_mode,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS", "CompressedLayer", "CompressionHandle", "SavedBytesMeter", "compress_model", "compressible_layers",
    "default_asi_ranks", "hosvd", "hosvd_ranks", "make_method", "method_options", "pack_region", "resolve_layers",
    "restore_model", "set_train_mode", "tucker_bytes", "tucker_elements", "tucker_weight_grad",
    "tucker_weight_grad_at_ranks", "unpack_region",
]
