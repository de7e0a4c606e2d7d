"""The Colab notebooks run top to bottom in smoke mode, and are committed clean.

Each notebook is executed with nbclient in a fresh kernel that runs this interpreter (a kernel
spec written to a temporary JUPYTER_PATH, so no `ipykernel install` is needed), with
LORA_JAX_NOTEBOOK_SMOKE=1 (tiny models, a few steps, no downloads: HF_HUB_OFFLINE=1 makes any
hub access fail), the working directory a temporary one (the notebooks write their outputs
there), and a timeout per cell. Any cell error fails the test with the cell's traceback.

    pytest tests/test_notebooks.py      # ~1-2 min on 2 CPU cores, the three notebooks together
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_lora_transform.ipynb", "02_squad_lora.ipynb", "03_peft_roundtrip.ipynb"]
COLAB = "https://colab.research.google.com/github/lora-jax/lora_jax/blob/main/notebooks/"
KERNEL = "lora-jax-test"
CELL_TIMEOUT_S = 240
EMBEDDED_MODEL = ROOT / "train" / "assets" / "world_model"


def _source(cell) -> str:
    return cell.source if isinstance(cell.source, str) else "".join(cell.source)


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """JUPYTER_PATH with a kernel spec for sys.executable, and the kernel's environment."""
    jp = tmp_path_factory.mktemp("jupyter")
    spec = jp / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lora_jax test kernel", "language": "python",
    }))
    env = {
        "JUPYTER_PATH": str(jp),
        "LORA_JAX_NOTEBOOK_SMOKE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        # the repo first, so the kernel imports this checkout's lora_jax and train
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    return env


def _standin_world_model(directory: Path) -> Path:
    """A random GPT-2 shaped like the embedded world model, with its tokenizer.

    Used only while train/assets/world_model/ has no weights yet (they are committed after
    pretraining); once model.safetensors is there the notebook runs on the real model.
    """
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    eos = tok.eos_token_id
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=128, n_layer=4, n_head=4, n_inner=512,
                     bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    GPT2LMHeadModel(cfg).save_pretrained(directory)
    for f in EMBEDDED_MODEL.iterdir():
        shutil.copy(f, directory / f.name)
    return directory


def _use_standin(nb, model_dir: Path) -> None:
    """Insert a cell before the job runs that points it at `model_dir` with the embedded preset."""
    i = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "run(parse_args(ARGS))" in _source(c))
    flags = ["--model", str(model_dir), "--targets", "c_attn,c_fc,mlp/c_proj", "--max-len", "192",
             "--max-new-tokens", "12"]
    nb.cells.insert(i, nbformat.v4.new_code_cell(f"ARGS += {flags!r}  # test only: stand-in world model"))


def test_the_three_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_and_opens_in_colab(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: commit without outputs"
    top = _source(nb.cells[0])
    assert nb.cells[0].cell_type == "markdown" and f"({COLAB}{path.name})" in top and "colab-badge.svg" in top
    install = next(_source(c) for c in nb.cells if c.cell_type == "code" and "%pip install" in _source(c))
    assert 'if "google.colab" in sys.modules:' in install
    assert re.search(r'%pip install -q "lora_jax(\[torch\])? @ git\+https://github.com/lora-jax/lora_jax"', install)
    assert "LORA_JAX_NOTEBOOK_SMOKE" in install
    assert path.stat().st_size < 40_000


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, kernel_env, tmp_path, monkeypatch):
    for k, v in kernel_env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(path, as_version=4)
    if path.name == "02_squad_lora.ipynb" and not (EMBEDDED_MODEL / "model.safetensors").is_file():
        _use_standin(nb, _standin_world_model(tmp_path / "standin_world_model"))
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, allow_errors=False,
        resources={"metadata": {"path": str(work)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed\n{e}", pytrace=False)
    if path.name == "02_squad_lora.ipynb":
        out = work / "runs" / "squad"
        for name in ("loss.png", "metrics.jsonl", "summary.json", "peft/adapter_config.json",
                     "peft/adapter_model.safetensors", "merged/model.safetensors"):
            assert (out / name).is_file(), name
    if path.name == "03_peft_roundtrip.ipynb":
        assert (work / "peft_adapter_tuned" / "adapter_model.safetensors").is_file()
