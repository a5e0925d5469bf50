"""The four zoo architectures, their layers and entropy models, and the registry.

Pure single-device PyTorch: no ray, mlflow, boto3 or torch.distributed here.
"""

from .architectures import (
    CompressionModel,
    FactorizedPrior,
    JointAutoregressiveHierarchicalPriors,
    MeanScaleHyperprior,
    ScaleHyperprior,
)
from .entropy import EntropyBottleneck, GaussianConditional, get_scale_table, pmf_to_quantized_cdf
from .layers import GDN, MaskedConv2d
from .loss import RateDistortionLoss, ms_ssim, psnr
from .registry import (
    ARCHITECTURES,
    METRICS,
    QUALITIES,
    ModelSpec,
    build,
    create_model,
    lambda_for,
    model_spec,
    spec_of,
)

__all__ = [
    "ARCHITECTURES", "METRICS", "QUALITIES", "GDN", "CompressionModel", "EntropyBottleneck",
    "FactorizedPrior", "GaussianConditional", "JointAutoregressiveHierarchicalPriors",
    "MaskedConv2d", "MeanScaleHyperprior", "ModelSpec", "RateDistortionLoss", "ScaleHyperprior",
    "build", "create_model", "get_scale_table", "lambda_for", "model_spec", "ms_ssim",
    "pmf_to_quantized_cdf", "psnr", "spec_of",
]
