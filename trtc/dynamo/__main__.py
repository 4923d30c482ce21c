"""python -m trtc.dynamo: a Dynamo worker over a trtc engine (trtc/dynamo/__init__.py)."""

import sys

try:
    from dynamo.common.backend.run import run
except ImportError:
    sys.exit("trtc.dynamo needs NVIDIA Dynamo's Python packages (ai-dynamo, ai-dynamo-runtime); "
             "install them with scripts/install_dynamo.sh")

from trtc.dynamo.engine import TrtcEngine

if __name__ == "__main__":
    run(TrtcEngine)
