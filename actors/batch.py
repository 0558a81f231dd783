"""The batch job inside a Ray cluster: `storymem.batch` with the in-cluster client.

    ray job submit -- python -m actors.batch s3://storymem/st-bench/ --out s3://storymem/results/st-bench.parquet
    python -m actors.batch ../shared/st-bench --out results.parquet      # a local cluster when none runs

Joins the running cluster (`ray.init(address="auto")`, as inside `ray job submit`) and its engine;
without a cluster it starts a local one and an engine in it. Options: `python -m storymem.batch -h`.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("storymem.batch")


def connect(cfg, address: str | None = None):
    """An EngineClient on the running cluster's engine; a local cluster and engine when there is none."""
    import ray

    from .api import get_engine
    from .client import EngineClient

    if not ray.is_initialized():
        try:
            ray.init(address=address or "auto", namespace=cfg.engine.namespace, logging_level=logging.WARNING)
        except ConnectionError:
            if address not in (None, "auto"):
                raise
            log.info("no running Ray cluster; starting a local one")
            cfg.storage.export_credentials()  # its workers inherit them: the engine's arguments hold none
            ray.init(namespace=cfg.engine.namespace, logging_level=logging.WARNING)
    try:
        handle = get_engine(cfg.engine.namespace)
    except ValueError:
        from . import start_engine

        log.info("no engine in the cluster; starting one")
        handle = start_engine(cfg)
    return EngineClient(handle, cfg=cfg)


def main(argv: list[str] | None = None) -> int:
    from storymem import batch

    return batch.main(argv, connect=connect)


if __name__ == "__main__":
    sys.exit(main())
