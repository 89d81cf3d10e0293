"""Fit a tokenizer and save it: python jobs/train_tokenizer.py --kind spectrum|scalar|image --input FILES --out PATH

spectrum: --input takes MaNGA-DAP style FITS (HDUs WAVE/FLUX/IVAR/MASK/Z) or MILES FITS (--format miles);
          --survey picks the registered modality whose config is the starting point.
scalar:   --input takes Parquet catalogues; --columns names the columns (default: the scalar table).
image:    --input takes single-band FITS fields of survey --survey (e.g. cfht_i); stamps are cut around the
          detected sources (engine.tokenizers.stamps) and the registered tok_image_<survey> codec is trained;
          --hdu picks the image HDU (default: the first 2-D one), --steps the training steps, --saturation
          the level at and above which pixels are masked ("header": the SATURATE / MAXLIN keyword, "none", or a number);
          --no-block-mode keeps every stamp in the learned codes (encode ~5x faster on a CPU; the mode bit of the
          scale token goes to twice the scale bins).
The resolved config is written next to the output as config.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
from dataclasses import asdict
from pathlib import Path


def _spectrum(a: argparse.Namespace, paths: list[str]):
    from engine.modalities.registry import entry
    from engine.modalities.spectra import read_manga, read_miles

    overrides = {k: v for k, v in (("codebook_size", a.codebook_size), ("patch_length", a.patch_length), ("seed", a.seed)) if v is not None}
    tok = entry(f"tok_spec_{a.survey}").build(**overrides)
    if a.format == "miles":
        batches = (read_miles(paths[i : i + 256], survey=a.survey) for i in range(0, len(paths), 256))
    else:
        batches = (read_manga(p, survey=a.survey) for p in paths)
    tok.fit(batches).save(a.out)
    return tok.config


def _scalar(a: argparse.Namespace, paths: list[str]):
    from engine.modalities import SCALARS
    from engine.tokenizers.scalar import ScalarTokenizer, ScalarTokenizerConfig

    columns = tuple(a.columns or [s.column for s in SCALARS])
    cfg = ScalarTokenizerConfig(columns=columns, rng_seed=a.seed or 0)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    ScalarTokenizer(cfg).fit(paths).save(Path(a.out) / "tokenizer.json")
    return cfg


def _image(a: argparse.Namespace, paths: list[str]):
    from engine.modalities.images import survey_spec
    from engine.modalities.registry import entry
    from engine.tokenizers.stamps import first_image_hdu, read_field, stamp_images

    overrides = {k: v for k, v in (("steps", a.steps), ("seed", a.seed)) if v is not None}
    registered = entry(f"tok_image_{a.survey}")
    base = registered.config_class()(**{**registered.config, **overrides})
    if a.no_block_mode and base.block_mode:
        overrides.update(block_mode=False, n_scale_bins=2 * base.n_scale_bins)
    tok = registered.build(**overrides)
    cfg, bands = tok.config, survey_spec(a.survey).bands
    images = []
    for path in paths:
        field = read_field(path, first_image_hdu(path) if a.hdu is None else a.hdu, _saturation(a.saturation))
        stamps = stamp_images(field, bands, cfg.crop_size, cfg.pixel_scale_arcsec)[1]
        images += stamps
        logging.getLogger("train_tokenizer").info("%s: %d stamps (%d in all)", path, len(stamps), len(images))
    tok.fit(images).save(a.out)
    return cfg


def _saturation(text: str) -> float | str | None:
    """--saturation: "header", "none" or a level in the image's units."""
    if text in ("header", "none"):
        return None if text == "none" else text
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"--saturation {text!r}: expected 'header', 'none' or a number") from None


KINDS = {"spectrum": _spectrum, "scalar": _scalar, "image": _image}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=sorted(KINDS), required=True)
    p.add_argument("--input", nargs="+", required=True, help="files or globs")
    p.add_argument("--out", required=True, help="directory to write the tokenizer into")
    p.add_argument("--survey", default="manga", help="spectrum/image: registered survey (tok_spec_<survey>, tok_image_<survey>)")
    p.add_argument("--format", choices=("manga", "miles"), default="manga", help="spectrum: input file layout")
    p.add_argument("--codebook-size", type=int)
    p.add_argument("--patch-length", type=int)
    p.add_argument("--columns", nargs="*", help="scalar: catalogue columns")
    p.add_argument("--seed", type=int)
    p.add_argument("--hdu", type=int, help="image: FITS HDU of the image plane (default: first 2-D HDU)")
    p.add_argument("--steps", type=int, help="image: training steps")
    p.add_argument("--saturation", default="header", help="image: mask pixels at or above this level: 'header' "
                   "(the SATURATE or MAXLIN keyword, if any), 'none', or a number in the image's units")
    p.add_argument("--no-block-mode", action="store_true", help="image: learned codes for every stamp (faster encode)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    paths = sorted({f for pattern in a.input for f in (glob.glob(pattern) or [pattern])})
    cfg = KINDS[a.kind](a, paths)
    resolved = {"kind": a.kind, "inputs": paths, "config": asdict(cfg)}
    (Path(a.out) / "config.json").write_text(json.dumps(resolved, indent=1, default=list))
    logging.getLogger("train_tokenizer").info("wrote %s tokenizer to %s", a.kind, a.out)


if __name__ == "__main__":
    main()
