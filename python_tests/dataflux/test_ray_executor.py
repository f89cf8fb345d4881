"""The Ray executor runs the same pipeline code and commits the same output as the local executor."""
import pytest

from mock_openai import MockOpenAIServer, http_roles
from test_resume import snapshot

from eureka_fast.dataflux.runner import load_config, run_dataflux

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_executor_matches_local(tiny_audio_dir, tmp_path):
    with MockOpenAIServer() as srv:
        cfg = load_config(None, {"shard_size": 2, "workers": 2, "categories": ["speaker_gender", "clip_duration"]})
        cfg["roles"] = http_roles(srv.base_url, timeout_s=20)
        run_dataflux(tiny_audio_dir, str(tmp_path / "local"), cfg, progress=False, log=lambda m: None)
        ray_cfg = load_config(None, {"shard_size": 2, "workers": 2, "executor": "ray", "ray_num_cpus": 1,
                                     "ray_batch_size": 2, "categories": ["speaker_gender", "clip_duration"]})
        ray_cfg["roles"] = cfg["roles"]
        try:
            stats = run_dataflux(tiny_audio_dir, str(tmp_path / "ray"), ray_cfg, progress=False, log=lambda m: None)
        finally:
            ray.shutdown()
    assert stats["clips"]["total"] == 4
    local, remote = snapshot(str(tmp_path / "local")), snapshot(str(tmp_path / "ray"))
    assert remote == local and remote["kept"]
