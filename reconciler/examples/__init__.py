"""Examples of an application's side of rq-reconciler (see README.md here). They ship in the
package as files to copy (reconciler/examples); the repo's examples/ links here."""
