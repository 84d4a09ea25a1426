"""Models: ``hippo.model.unet`` (plain torch) and ``hippo.model.module`` (the LightningModule).

Nothing is imported here so that ``hippo.infer`` can use the UNet without importing Lightning.
"""
