"""llama.cpp's own HTTP server (xllamacpp's built-in one) on a GGUF with the runner's engine
parameters (threads, 16 slots, one unified KV cache): the server users would run instead of
exojet on llama.cpp. Serves until SIGTERM.

    .venv/bin/python bench/llamacpp_server.py GGUF PORT
"""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exojet.runner.engine_llamacpp import MAX_CONTEXT, gguf_facts, server_params

# Every stream holds an HTTP thread while it streams: enough for the bench's 32 and some.
HTTP_THREADS = 40


def main(gguf: Path, port: int) -> None:
    import xllamacpp

    context = min(MAX_CONTEXT, gguf_facts(gguf).context_length or MAX_CONTEXT)
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        params = server_params(gguf, context, Path(tmp) / "unused.sock")
        params.hostnames = ["127.0.0.1"]
        params.port = port
        params.n_threads_http = HTTP_THREADS
        server = xllamacpp.Server(params)
        print(f"llama.cpp server on {server.listening_address}", flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(Path(sys.argv[1]), int(sys.argv[2]))
