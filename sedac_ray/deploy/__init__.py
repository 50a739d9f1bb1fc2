"""Deploy configs: offline validation (``validate``) and KubeRay manifest rendering (``render``)."""
