"""The medseg service: FastAPI app (:mod:`service.app`), job store, queue, workers, auth, limits
and DICOMweb STOW-RS. Started by ``medseg serve``."""
