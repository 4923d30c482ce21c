"""trtc as a backend of NVIDIA Dynamo: a Dynamo worker over trtc's engine core.

    python -m trtc.dynamo --model ENGINE_OR_HF_DIR [--served-model-name NAME] [--namespace dynamo]
        [--component trtc] [--discovery-backend etcd|file|kubernetes] [--kv-cache-free-gpu-memory-fraction F]

Dynamo's frontend (`python -m dynamo.frontend`) tokenizes, applies the chat template, detokenizes and
routes; each worker is one trtc engine core (its own process, as behind `trtc serve`) that streams
token ids back, cancels what the frontend drops, and publishes the KV blocks it registers and evicts
(for `--router-mode kv`) and its load (running requests, KV usage). The `ai-dynamo` packages are not
a dependency of trtc: `scripts/install_dynamo.sh` installs them.
"""
