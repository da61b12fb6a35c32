"""Model families: one package each (xval, astroclip, mpp). A family never imports another."""
