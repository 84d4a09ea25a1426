"""Data: NIfTI pairs, preprocessing, the Lightning data module, curation, synthetic data, download.

Import the submodules directly (``hippo.data.nifti``, ``hippo.data.datamodule``...): this package
imports nothing heavy so that deploy-side code can use ``hippo.data.nifti`` without Lightning.
"""
