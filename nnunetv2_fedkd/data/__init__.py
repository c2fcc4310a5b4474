"""Everything before training, knowing nothing of training: public layouts converted to the organ registry
(:mod:`.conversion`), the pooled partial-label dataset and its per-case label-availability table (:mod:`.pooled`,
:mod:`.label_availability`), CPU-sized plans (:mod:`.small_plans`) and the synthetic federation (:mod:`.synthetic`)."""
