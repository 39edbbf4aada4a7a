"""Limits on what a model file may make the engine do, in one place (docs/model_package.md, "Limits").

A model package, an ONNX file or a chip manifest is data from elsewhere: whatever it declares, the
engine refuses it, with a message naming the file, the limit and the fix, before memory or time is
spent on it. The limits are generous for real models: the bundled ones, smp/timm U-Nets up to
1 000 M parameters (4 GB of float32 weights), tiles up to 4096 px.
"""
import json

from .errors import ModelPackageError

#: model.json, an ONNX metadata value, a safetensors header: bytes, and nesting of arrays/objects
MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 64
#: model.safetensors: file size, size of its JSON header, parameters (elements of all tensors)
MAX_WEIGHTS_BYTES = 4 << 30
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20
MAX_PARAMETERS = 1_000_000_000
#: a zip package: a member that inflates more than this many times its compressed size (above 1 MiB) is
#: refused (real weights compress by less than 1.5 x; a zip bomb by 1000 x)
MAX_ZIP_RATIO = 100
ZIP_RATIO_MIN_BYTES = 1 << 20
#: classes of a segmentation model: the class raster is Byte, 255 is nodata; object classes of a detector
MAX_CLASSES = 254
MAX_DETECTION_CLASSES = 10_000
#: tiles: edge in pixels, and tile x batch x (bands + classes) x 4 bytes (the float32 tiles and
#: probabilities of one batch)
MAX_TILE_SIZE = 4096
MAX_TILE_BATCH_BYTES = 4 << 30
#: the largest query image of a similarity search (rs_deep:find_similar), read whole: 4096 x 4096 px
MAX_QUERY_PIXELS = MAX_TILE_SIZE * MAX_TILE_SIZE
#: ONNX: working memory of one run of the graph (activations, outputs; the weights are not counted).
#: A ResNet-34 U-Net needs about 1.2 GiB for 2 tiles of 1024 px.
MAX_ONNX_WORKING_BYTES = 3 << 30
#: streaming reads (checksums, zip members)
CHUNK_BYTES = 1 << 20


def size_text(n):
    """``n`` bytes as text: 4 GiB, 16 MiB, 600 KiB."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / float(1 << shift)
            return f"{v:.0f} {unit}" if v >= 10 or abs(v - round(v)) < 0.05 else f"{v:.1f} {unit}"
    return f"{n} bytes"


def count_text(n):
    """A parameter count as text: 1 000 M, 14.3 M."""
    m = n / 1e6
    return f"{m:,.0f} M".replace(",", " ") if m >= 100 else f"{m:.3g} M"


def json_depth(obj):
    """Deepest nesting of lists/dicts in a parsed JSON value (0 for a scalar); iterative, any depth."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        elif not isinstance(value, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((v, depth + 1) for v in value if isinstance(v, (list, dict)))
    return deepest


def loads_json(data, what, error=ModelPackageError, fix="re-export it"):
    """``json.loads`` for data from a model file or a manifest: invalid JSON, JSON nested more than
    :data:`MAX_JSON_DEPTH` levels (which would exhaust the recursion of the parser) or text that is not
    UTF-8 raise ``error`` naming ``what``, never RecursionError or ValueError."""
    try:
        if isinstance(data, (bytes, bytearray)):
            data = bytes(data).decode("utf-8")
        obj = json.loads(data)
    except RecursionError:
        raise error(f"{what} is not valid JSON for RS Deep: arrays or objects are nested more than "
                    f"{MAX_JSON_DEPTH} levels deep (the limit; a real file nests fewer than 10); {fix}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{what} is not valid JSON ({exc}); {fix}") from exc
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise error(f"{what} is not valid JSON for RS Deep: arrays or objects are nested more than "
                    f"{MAX_JSON_DEPTH} levels deep (the limit; a real file nests fewer than 10); {fix}")
    return obj


def tile_batch_bytes(tile, batch, bands, classes):
    """Bytes of one batch of float32 tiles and their class probabilities."""
    return 4 * int(tile) * int(tile) * int(batch) * (int(bands) + int(classes))


def check_tile_memory(tile, batch, bands, classes, tile_from, batch_from="BATCH_SIZE", error=None):
    """Refuse a tile size / batch size whose tiles alone would not fit the limits, before anything is
    allocated. ``tile_from`` / ``batch_from`` say where the values come from (for the message);
    ``error`` is the exception class (InputError for parameters, ModelPackageError for a package)."""
    from .errors import InputError
    error = error or InputError
    if tile > MAX_TILE_SIZE:
        raise error(f"{tile_from} is {tile} px: more than the largest tile RS Deep runs ({MAX_TILE_SIZE} px, the "
                    f"limit). Set TILE_SIZE to {MAX_TILE_SIZE} or less (512 suits most models).")
    need = tile_batch_bytes(tile, batch, bands, classes)
    if need > MAX_TILE_BATCH_BYTES:
        fit = MAX_TILE_BATCH_BYTES // tile_batch_bytes(tile, 1, bands, classes)
        if fit >= 1:
            fix = f"Set BATCH_SIZE to {fit} or less, or a smaller TILE_SIZE."
        else:
            edge = int((MAX_TILE_BATCH_BYTES / (4.0 * (bands + classes))) ** 0.5) // 32 * 32
            fix = f"Set TILE_SIZE to {max(32, edge)} or less (and BATCH_SIZE 1)."
        raise error(f"{tile_from} {tile} px with {batch_from} {batch}: one batch of {bands}-band tiles and "
                    f"their {classes} class probabilities needs {size_text(need)}, more than the limit of "
                    f"{size_text(MAX_TILE_BATCH_BYTES)}. {fix}")
    return need


__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_WEIGHTS_BYTES", "MAX_SAFETENSORS_HEADER_BYTES",
           "MAX_PARAMETERS", "MAX_ZIP_RATIO", "ZIP_RATIO_MIN_BYTES", "MAX_CLASSES", "MAX_DETECTION_CLASSES",
           "MAX_TILE_SIZE", "MAX_TILE_BATCH_BYTES", "MAX_QUERY_PIXELS", "MAX_ONNX_WORKING_BYTES", "CHUNK_BYTES",
           "size_text", "count_text", "json_depth", "loads_json", "tile_batch_bytes", "check_tile_memory"]
