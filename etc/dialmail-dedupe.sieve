# dialmail's duplicate guard for LMTP delivery (Dovecot: sieve_before = this file, compiled
# with `sievec`).  dialmail names every copy it hands over in X-Dialmail-Delivery: (the
# same name at every try).  When dialmail or Dovecot is killed after Dovecot stored a copy
# but before dialmail recorded the reply, dialmail hands the copy over again; this script
# discards it instead of filing it twice.  Mail without the header is not touched.
require ["duplicate"];
if header :matches "X-Dialmail-Delivery" "?*" {
  if duplicate :header "X-Dialmail-Delivery" {
    discard;
    stop;
  }
}
