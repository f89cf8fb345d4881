"""Integrations of eureka_fast kernels into other libraries' models.

``eureka_fast.integrations.transformers``: importing it registers ``experts_implementation="eureka_fast"`` in
transformers 5 and provides ``apply_fast_moe(model)`` (also reachable as ``eureka_fast.apply_fast_moe``).
Kept out of ``import eureka_fast`` so that importing the package does not import transformers.
"""
