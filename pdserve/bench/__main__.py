"""``python -m pdserve.bench``: the bench commands without the top-level CLI."""

from pdserve.bench.cli import bench_app

bench_app(prog_name="pdserve bench")
