"""The building blocks of the JetMoe network, each with its PyTorch reference implementation.

``norm`` (RMSNorm), ``rotary`` (rotate-half rotary embedding), ``routing`` (top-k router), ``experts``
(stacked expert weights, the mixture of MLP experts and the attention experts' projections) and
``attention`` (the paged attention seam, its metadata and the reference backend). Faster implementations live
in ``model.kernels`` and are handed to the layers as a ``Kernels`` bundle when the model is built.
"""
