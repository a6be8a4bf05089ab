"""The stages, each a function ``stage(cfg, run_dir, ...)`` of a resolved :class:`~gradcouple.config.RunConfig`
and a run directory, returning a typed result:

    extract   per-piece gradients into fp16 shards            (extract.py; resume.py under torchrun)
    couple    GradSim, the cosine of those gradients          (couple.py; gram_share.py under torchrun)
    ripple    real edits and their measured ripple effect     (ripple.py; benchmark.py for benchmark edits)
    report    one offline HTML page and summary.json          (report/)
    pipeline  all of them with one model load (`gradcouple run`)

The notebook API (:mod:`gradcouple.api`, exported as ``gradcouple.extract`` etc.) and the CLI
(:mod:`gradcouple.cli`) resolve a config and call these.
"""
