"""OmniQuant-based MatQuant calibration (spec §3-§6): block-wise LWC + LET, int8 export.

    from matquant_jax import calibration
    setup = calibration.resolve(config)                       # ConfigError before compiling
    result = calibration.calibrate_blocks(setup, params, tokens, workdir=...)
    calibration.export_calibrated(path, setup, params, result)  # MatQuantCheckpoint format

or from the command line: `python -m matquant_jax.calibrate --config=configs/tiny_omniquant.py`.
"""

from matquant_jax.calibration.block import StepOptions
from matquant_jax.calibration.block import block_functions
from matquant_jax.calibration.calibrator import CalibrationResult
from matquant_jax.calibration.calibrator import calibrate_blocks
from matquant_jax.calibration.calibrator import export_calibrated
from matquant_jax.calibration.calibrator import fold_and_clipping
from matquant_jax.calibration.config import CalibSetup
from matquant_jax.calibration.config import ConfigError
from matquant_jax.calibration.config import default_config
from matquant_jax.calibration.config import make_calib_objective
from matquant_jax.calibration.config import paper_budget_tokens
from matquant_jax.calibration.config import paper_omniquant_config
from matquant_jax.calibration.config import resolve
from matquant_jax.calibration.pipeline import run
from matquant_jax.calibration.transform import CalibOptions
from matquant_jax.calibration.transform import fold_let
from matquant_jax.calibration.transform import fold_model_params
from matquant_jax.calibration.transform import init_calib_params
from matquant_jax.calibration.transform import quantized_block_params

__all__ = [
    "CalibOptions", "CalibSetup", "CalibrationResult", "ConfigError", "StepOptions",
    "block_functions", "calibrate_blocks", "default_config", "export_calibrated",
    "fold_and_clipping", "fold_let", "fold_model_params", "init_calib_params",
    "make_calib_objective", "paper_budget_tokens", "paper_omniquant_config",
    "quantized_block_params", "resolve", "run",
]
