"""Hugging Face model ids wherever a model directory is taken (`--model_dir`, `LLM(...)`, `trtc serve`):
`meta-llama/Llama-3.1-8B-Instruct` (at `--revision`, a branch, tag or commit) is fetched with
huggingface_hub's `snapshot_download` into its cache (HF_HUB_CACHE, HF_HOME), only the files trtc
reads: config.json, the safetensors weights and their index, ModelOpt's hf_quant_config.json and
the tokenizer files. A local directory is used as it is. HF_HUB_OFFLINE=1 reads the cache only;
a model that is neither cached nor reachable is one line saying what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

from trtc.converters.hf_checkpoint import TOKENIZER_FILES
from trtc.errors import TrtcError

ALLOW_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "hf_quant_config.json",
                  *TOKENIZER_FILES]
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_model_id(model: str) -> bool:
    return bool(_REPO_ID.fullmatch(model)) and ".." not in model and not Path(model).exists()


def resolve_model_dir(model: str | Path, revision: str | None = None) -> Path:
    """A local model directory for `model`: itself, or the Hub snapshot of the model id."""
    path = Path(model)
    if path.is_dir():
        if revision is not None:
            raise TrtcError(f"--revision {revision} picks a version of a Hub model id, but {model} is a local "
                            "directory; drop --revision or pass the model id")
        return path
    if not is_model_id(str(model)):
        raise TrtcError(f"{model} does not exist; pass a local HF model directory or a Hugging Face model id (org/name)")
    return _download(str(model), revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision}" if revision else ""
    cache = constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except GatedRepoError:
        raise TrtcError(f"{repo_id} is gated on the Hugging Face Hub; accept its license on its page and log in "
                        "(`hf auth login` or HF_TOKEN), or pass a local directory") from None
    except RepositoryNotFoundError:
        raise TrtcError(f"{repo_id} is not a model on the Hugging Face Hub (or it is private: log in with "
                        "`hf auth login` or HF_TOKEN); check the id, or pass a local directory") from None
    except RevisionNotFoundError:
        raise TrtcError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub; pass an existing branch, "
                        "tag or commit to --revision") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise TrtcError(f"{repo_id}{at} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
                            "download it where the Hub is reachable (`hf download`, same HF_HUB_CACHE), unset "
                            "HF_HUB_OFFLINE, or pass a local directory") from None
        raise TrtcError(f"cannot reach the Hugging Face Hub for {repo_id}{at} and it is not in the cache ({cache}); "
                        "check the network (HF_ENDPOINT, proxy), or set HF_HUB_OFFLINE=1 with the model in "
                        "HF_HUB_CACHE, or pass a local directory") from None
    except (HfHubHTTPError, OSError) as e:
        raise TrtcError(f"downloading {repo_id}{at} from the Hugging Face Hub failed ({str(e).splitlines()[0]}); "
                        "retry, set HF_HUB_OFFLINE=1 with the model in HF_HUB_CACHE, or pass a local directory") from None
