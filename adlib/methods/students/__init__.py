"""Uninformed Students (Bergmann et al., CVPR 2020): the ``teacher`` and the students' ``ensemble``."""
