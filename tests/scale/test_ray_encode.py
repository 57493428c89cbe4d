"""Ray Data encoding on a local Ray instance (CPU only): the same shards as one process writes."""

from __future__ import annotations

import numpy as np
import pytest

from st_mamba.scale import encode_corpus, load_shards
from tests.scale.conftest import write_corpus

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def local_ray():
    # Bound to 127.0.0.1, which the socket guard allows; no dashboard, quiet workers.
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_ray_data_output_equals_single_process_output(local_ray, model_dir, tmp_path):
    from st_mamba.scale import encode_corpus_ray

    rows = write_corpus(tmp_path / "corpus.jsonl", 90)
    options = dict(shard_size=20, dtype="float32", progress=False)
    encode_corpus_ray(tmp_path / "corpus.jsonl", model_dir, tmp_path / "ray", workers=2, **options)
    encode_corpus(tmp_path / "corpus.jsonl", model_dir, tmp_path / "single", **options)
    on_ray, single = load_shards(tmp_path / "ray"), load_shards(tmp_path / "single")
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir()
    )
    assert on_ray.ids == single.ids == [row["_id"] for row in rows]
    # Same batches; Ray actors run on one thread each, so equal up to float rounding.
    np.testing.assert_allclose(on_ray.embeddings, single.embeddings, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(on_ray.positions, single.positions)
