#!/bin/sh
# A test PKI for the daemon's TLS (`vessel daemon --tls-cacert/--tls-cert/--tls-key`),
# made with the openssl CLI in DIR: a CA (ca.pem) with certificates for two daemons and a
# client (src, dst, client: .pem and .key, for 127.0.0.1 and localhost, usable as server
# and as client certificates), and a second CA (other-ca.pem) with a certificate of its
# own (other), which the daemons must refuse. Used by the tests; an example for real
# hosts too (give each its own name or address in subjectAltName).
#
#   scripts/tls-test-certs.sh DIR
set -eu
dir=$1
mkdir -p "$dir"
cd "$dir"
cat > openssl.cnf <<'EOF'
[req]
distinguished_name=dn
[dn]
[ca]
basicConstraints=critical,CA:TRUE
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
[leaf]
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
authorityKeyIdentifier=keyid
EOF
for ca in ca other-ca; do
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$ca.key" -out "$ca.pem" -days 2 -subj "/CN=vessel test $ca" \
        -config openssl.cnf -extensions ca 2>/dev/null
done
leaf() {
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$1.key" -out "$1.csr" -subj "/CN=vessel test $1" -config openssl.cnf 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -days 2 \
        -extfile openssl.cnf -extensions leaf -out "$1.pem" 2>/dev/null
}
leaf src ca
leaf dst ca
leaf client ca
leaf other other-ca
