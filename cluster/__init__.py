"""Deployment of the StoryMem service: one machine (`python -m cluster.local`) and KubeRay manifests."""
