"""PIC: parametric instance classification and the methods it is compared with."""
