"""
The pinned hashes of the published files in models.PRETRAINED.

    python -m pytest tests/test_diffusers.py
"""
import contextlib
import http.server
import os
import threading

import pytest

import models

# -----------------------------------------------------------------------------
# pinned hashes

@contextlib.contextmanager
def serving(files):
    """A loopback HTTP server for {url path: bytes}; other paths get a 404."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in files:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[self.path])))
            self.end_headers()
            self.wfile.write(files[self.path])
        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()

def test_pinned_entry_refuses_a_wrong_file_and_leaves_nothing(tmp_path, monkeypatch):
    name = "sd-vae-ft-mse.safetensors"
    url, sha = models.PRETRAINED[name]
    assert sha == "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815"
    with serving({"/" + name: b"not the VAE" * 1000}) as server:
        monkeypatch.setattr(models, "PRETRAINED", {name: (server + "/" + name, sha)})
        monkeypatch.setattr(models, "PRETRAINED_DIR", str(tmp_path))
        with pytest.raises(ValueError, match="SHA-256 .* is not the expected a1d993488569e928...; download deleted"):
            models.pretrained_file(name)
    assert os.listdir(tmp_path) == []  # no file, no temp file, no recorded hash
