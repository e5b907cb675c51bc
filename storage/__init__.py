"""On-disk formats that the zoo and the runtime both read: verified checkpoints (:mod:`storage.checkpoint`,
:mod:`storage.safe_state`), latent-cache manifests (:mod:`storage.latent_cache`) and atomic JSON files
(:mod:`storage.files`). This package imports neither ``zoo`` nor ``runtime`` nor ``registry``."""
