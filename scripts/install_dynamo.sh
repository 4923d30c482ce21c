#!/usr/bin/env bash
# Installs NVIDIA Dynamo's Python packages into the active environment, for `python -m trtc.dynamo`
# (trtc as a Dynamo worker) and `python -m dynamo.frontend`. ai-dynamo 1.6.1 declares a dependency,
# aisimulate 0.13.0, that is a placeholder downloading from another index: the two Dynamo packages are
# installed without their declared dependencies, and those they need by name.
#   bash scripts/install_dynamo.sh
# Multi-node discovery (etcd) and the event plane (NATS) are services, not Python packages: on Debian,
# `apt-get install etcd-server nats-server`. One machine needs neither (--discovery-backend file).
set -euo pipefail
python -m pip install --no-deps ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1
python -m pip install aiohttp certifi "kubernetes<33" msgspec prometheus-client pyzmq "redis<9" tqdm transformers \
  typing-extensions "zstandard<1" uvloop "pydantic<=2.13.5"
python -c "import dynamo.common.backend, dynamo.frontend" 2>/dev/null \
  || { echo "install_dynamo.sh: Dynamo does not import after the install" >&2; exit 1; }
