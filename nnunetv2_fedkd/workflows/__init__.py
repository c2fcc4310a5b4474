"""The user's path, calling the parts of the package: the ``nnunetv2_fedkd`` command (:mod:`.cli`), the stock steps
(:mod:`.pipeline`), the demo, the stock pseudo-label recipe and the student-vs-teachers comparison. Nothing in the
package imports this folder."""
