"""A config composed from a snapshot of its YAML files (``config.snapshot``), not from the disk.

Pure tests of ``config.load.load_config`` with a ``ConfigTexts`` on files in
``tmp_path`` (no event loop): a load from the disk records the texts of the
main file and of every included file, and what each include pattern matched;
a load from that snapshot (after a trip through JSON, as a supervisor message
carries it) composes the same config while the files on disk say something
else, a new file matches the pattern, or the YAML files are gone. Files the
config only references (a ``tokens_file``) are still read from disk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from textwrap import dedent

import pytest

from wsproxy.config.load import load_config
from wsproxy.config.schema import PoolName
from wsproxy.config.snapshot import ConfigTexts, Snapshot
from wsproxy.errors import ConfigErrors

MAIN = """\
    include: ["conf.d/*.yaml"]
    listeners:
      - {name: public, bind: "127.0.0.1:8080"}
    routes:
      - {path: /chat, pool: chat, auth: {tokens_file: tokens.txt}}
    """
POOLS = """\
    pools:
      chat: {backends: [{address: "127.0.0.1:9001"}]}
    """


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dedent(text))
    return path


def tokens(*names: str) -> str:
    return "".join(f"{name} {hashlib.sha256(name.encode()).hexdigest()}\n" for name in names)


def loaded(tmp_path: Path) -> tuple[str, Snapshot]:
    """The config's main path and the snapshot of its load from disk (then carried through JSON)."""
    main = write(tmp_path / "wsproxy.yaml", MAIN)
    write(tmp_path / "conf.d" / "pools.yaml", POOLS)
    (tmp_path / "tokens.txt").write_text(tokens("alice"))
    texts = ConfigTexts()
    config = load_config(str(main), texts)
    assert config.pools[PoolName("chat")].backends[0].address.port == 9001
    snapshot = Snapshot.from_data(json.loads(json.dumps(texts.snapshot().to_data())))
    return str(main), snapshot


def test_the_snapshot_holds_every_yaml_file_read_and_what_each_pattern_matched(tmp_path: Path) -> None:
    main, snapshot = loaded(tmp_path)
    pools = str(tmp_path / "conf.d" / "pools.yaml")
    assert snapshot.path == main
    assert list(snapshot.texts) == [main, pools]  # the YAML only: not the token file
    assert snapshot.texts[main] == dedent(MAIN) and snapshot.texts[pools] == dedent(POOLS)
    assert snapshot.globs == {str(tmp_path / "conf.d" / "*.yaml"): (pools,)}


def test_a_load_from_the_snapshot_follows_it_not_the_files_on_disk(tmp_path: Path) -> None:
    main, snapshot = loaded(tmp_path)
    write(tmp_path / "wsproxy.yaml", MAIN.replace("8080", "8081"))
    write(tmp_path / "conf.d" / "pools.yaml", POOLS.replace("9001", "9002"))
    write(tmp_path / "conf.d" / "timeouts.yaml", "timeouts: {idle: 7m}\n")  # matches the pattern now
    from_disk = load_config(main)
    assert (from_disk.listeners[0].bind.port, from_disk.pools[PoolName("chat")].backends[0].address.port) == (8081, 9002)
    assert from_disk.timeouts.idle_s == 420

    from_snapshot = load_config(main, ConfigTexts(snapshot))
    assert from_snapshot.listeners[0].bind.port == 8080
    assert from_snapshot.pools[PoolName("chat")].backends[0].address.port == 9001
    assert from_snapshot.timeouts.idle_s != 420  # the file the pattern matches since is not part of it


def test_a_load_from_the_snapshot_reads_no_yaml_file_but_the_referenced_files(tmp_path: Path) -> None:
    main, snapshot = loaded(tmp_path)
    (tmp_path / "wsproxy.yaml").unlink()
    (tmp_path / "conf.d" / "pools.yaml").unlink()
    (tmp_path / "tokens.txt").write_text(tokens("alice", "bob"))  # referenced: read at every load, as before
    config = load_config(main, ConfigTexts(snapshot))
    assert config.pools[PoolName("chat")].backends[0].address.port == 9001
    auth = config.routes[0].auth
    assert auth is not None and [t.name for t in auth.tokens] == ["alice", "bob"]


def test_a_file_not_in_the_snapshot_is_an_error_not_a_read(tmp_path: Path) -> None:
    main, snapshot = loaded(tmp_path)
    with pytest.raises(ConfigErrors) as info:
        load_config(str(tmp_path / "other.yaml"), ConfigTexts(snapshot))
    assert "is not in the snapshot of the config in effect" in str(info.value.errors[0])
    write(tmp_path / "wsproxy.yaml", MAIN.replace('"conf.d/*.yaml"', '"conf.d/pools.yaml", "more.yaml"'))
    write(tmp_path / "more.yaml", "timeouts: {idle: 7m}\n")
    moved = Snapshot(main, {main: (tmp_path / "wsproxy.yaml").read_text(), **{k: v for k, v in snapshot.texts.items() if k != main}})
    with pytest.raises(ConfigErrors) as info:
        load_config(main, ConfigTexts(moved))
    assert f"cannot read {tmp_path / 'more.yaml'}" in str(info.value.errors[0])


@pytest.mark.parametrize(
    "data",
    [None, [], {"path": "a.yaml"}, {"path": "a.yaml", "texts": {"a.yaml": 1}, "globs": {}},
     {"path": "a.yaml", "texts": {}, "globs": {"*.yaml": "a.yaml"}}],
)
def test_what_is_not_a_snapshot_is_refused(data: object) -> None:
    with pytest.raises(ValueError):
        Snapshot.from_data(data)


def test_the_yaml_files_together_are_capped_so_that_a_snapshot_fits_one_message(tmp_path: Path) -> None:
    """Each file may be 16 MiB; together too, so the JSON of a snapshot (≤ 3× UTF-8) fits in 64 MiB."""
    from wsproxy.config.snapshot import MAX_TOTAL_BYTES
    from wsproxy.supervisor.messages import MAX_LINE_BYTES

    assert 3 * MAX_TOTAL_BYTES + 4096 < MAX_LINE_BYTES
    main = write(tmp_path / "wsproxy.yaml", MAIN)
    write(tmp_path / "conf.d" / "pools.yaml", POOLS)
    (tmp_path / "tokens.txt").write_text(tokens("alice"))
    filler = "# " + "x" * (MAX_TOTAL_BYTES // 2) + "\n"  # a comment: valid YAML, half the cap each
    write(tmp_path / "conf.d" / "a.yaml", filler)
    write(tmp_path / "conf.d" / "b.yaml", filler)
    with pytest.raises(ConfigErrors) as info:
        load_config(str(main), ConfigTexts())
    message = str(info.value.errors[0])
    assert f"cannot read {tmp_path / 'conf.d' / 'b.yaml'}: the config's YAML files would add up to" in message, message
    assert "over 16 MiB together" in message
