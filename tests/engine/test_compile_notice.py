"""Commands that load a compiled engine say so first when the compile cache is cold (minutes of
compiling on CPU would otherwise look like a hang), and say nothing once it is warm."""

from dexserve.engine.config import EngineConfig
from dexserve.launch.engine_options import compile_notice


def test_a_cold_cache_is_announced_and_a_warm_one_is_not(tmp_path, monkeypatch):
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    assert compile_notice(EngineConfig(compile=False)) is None          # eager steps: nothing to compile
    notice = compile_notice(EngineConfig(compile=True))
    assert notice and str(cache) in notice and "--no-compile" in notice  # no cache yet
    cache.mkdir()
    assert compile_notice(EngineConfig(compile=True))                    # an empty one is still cold
    (cache / "fxgraph").mkdir()
    assert compile_notice(EngineConfig(compile=True)) is None            # warm
