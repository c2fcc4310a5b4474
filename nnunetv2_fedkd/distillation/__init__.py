"""Frozen teachers and what the student needs from them: loading and running them on the student's patches
(:mod:`.teachers`), their outputs cached per case (:mod:`.teacher_cache`) and the gate that scores each teacher at a
site (:mod:`.teacher_site_gate`)."""
