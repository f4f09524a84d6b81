"""The minimal sandbox image: built locally from Debian packages, never pulled."""

from .build import BuildResult, build_image, image_inputs_digest

__all__ = ["BuildResult", "build_image", "image_inputs_digest"]
