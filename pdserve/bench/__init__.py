"""``pdserve bench``: serving benchmarks with SLO goodput and side-by-side comparisons.

Modules follow the pipeline: ``workloads`` (what to send) -> ``arrival`` (when) ->
``client`` (one streamed request, timed) -> ``runner`` (phases per target) ->
``metrics`` (statistics, goodput) -> ``report``/``plots`` (JSON, markdown, PNG);
``setups``/``compare`` start and stop the systems under test; ``cli`` is the typer app.
"""
