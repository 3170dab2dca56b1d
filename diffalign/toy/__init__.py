"""The embedded toy worlds of ``diffalign demo`` and ``diffalign evidence``."""

# Every toy command retrains its runs from scratch when rerun, so that a report always measures the current code and
# settings: the runs under outputs/ are results to regenerate, not work to keep. Pass train.overwrite_output_dir=false
# to resume an interrupted run instead (docs/runs.md).
RETRAIN = "train.overwrite_output_dir=true"
