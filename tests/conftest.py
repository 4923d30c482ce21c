import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# ../shared/fixtures beside the checkout, or where TRTC_FIXTURES points (a copy carried to a GPU machine)
FIXTURES = Path(os.environ.get("TRTC_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"{FIXTURES} is absent")
    return FIXTURES


@pytest.fixture(scope="session")
def tp_engines(tmp_path_factory):
    """A tiny Llama (4 heads, 2 KV heads, vocab 131: padded under tp) with a word tokenizer, built
    as float32 engines for tp 1, 2 and 4 (KV heads replicated), with small blocks and a small token
    budget so that prompts are prefilled in chunks."""
    from models import add_word_tokenizer, make_hf_model

    from trtc.compiler.build import build_from_hf
    from trtc.formats.build_config import BuildConfig

    root = tmp_path_factory.mktemp("tp")
    hf = add_word_tokenizer(make_hf_model(root / "hf", "llama3_gqa"))
    config = BuildConfig(max_batch_size=8, max_num_tokens=24, tokens_per_block=4, max_seq_len=96)
    engines = {tp: build_from_hf(hf, root / f"tp{tp}", tp_size=tp, dtype="float32", build_config=config, progress=False)
               for tp in (1, 2, 4)}
    return hf, engines


@pytest.fixture(scope="session")
def other_tp2_engine(tp_engines, tmp_path_factory):
    """A tp 2 engine of another model of the same shape: another build."""
    from models import make_hf_model

    from trtc.compiler.build import build_from_hf
    from trtc.formats.build_config import BuildConfig

    root = tmp_path_factory.mktemp("tp_other")
    return build_from_hf(make_hf_model(root / "hf", "llama3_gqa", seed=1), root / "tp2", tp_size=2, dtype="float32",
                         build_config=BuildConfig(max_batch_size=8, max_seq_len=96), progress=False)
