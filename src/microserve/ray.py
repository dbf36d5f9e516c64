"""The Ray Serve entry point: ``serve run microserve.ray:app_builder`` and RayService's ``import_path``."""

from microserve.scale.ray_app import app_builder, build_application

__all__ = ["app_builder", "build_application"]
