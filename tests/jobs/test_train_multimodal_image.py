"""jobs/train_multimodal.py --kind image on a real field (the CFHT test cutout), reusing the shipped image tokenizer."""

import json
import subprocess
import sys
from pathlib import Path

from engine.model.bundle import ModelBundle

ROOT = Path(__file__).resolve().parents[2]
CUTOUT = ROOT / "tests/data/images/cfht_a370_cutout.fits"
TOKENIZER = ROOT / "engine/data/image_model/tokenizers/tok_image_cfht_i"


def test_the_job_trains_and_writes_a_loadable_image_model(tmp_path):
    out = tmp_path / "model"
    cmd = [sys.executable, str(ROOT / "jobs/train_multimodal.py"), "--kind", "image", "--image-field", str(CUTOUT),
           "--image-tokenizer", str(TOKENIZER), "--out", str(out), "--steps", "6", "--dim", "32", "--encoder-depth", "1",
           "--decoder-depth", "1", "--batch-size", "8", "--model-id", "tiny-image"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert (report["n_train_stamps"], report["n_holdout"]) == (27, 8)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_id"] == "tiny-image" and saved["training"]["config"]["steps"] == 6
    assert saved["training"]["data"] == str(CUTOUT) and saved["model"]["dim"] == 32
    bundle = ModelBundle.load(out)
    assert bundle.supported_targets == ("mag_aper", "flux_radius", "ellipticity", "tok_image_cfht_i")
