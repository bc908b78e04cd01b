"""The edge's secret noise key: 32 random bytes made once per installation.

It lives in the user's config directory ($XDG_CONFIG_HOME/fedsea/edge.key, else
~/.config/fedsea/edge.key), readable by its owner only.  It must stay on the device: with
it the server could regenerate the noise of any prefix it can guess and subtract it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fedsea_shared.noise import KEY_BYTES


def default_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "fedsea" / "edge.key"


def load_or_create_key(path: Path | None = None) -> bytes:
    path = path or default_key_path()
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:  # link, not rename: if another process made the key first, keep theirs
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte fedsea edge key; delete it to make a new one")
    return key
