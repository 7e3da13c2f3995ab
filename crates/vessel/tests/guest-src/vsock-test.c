/* A guest-side vsock peer for Vessel's tests (built with gcc -static by the test).
 *   vsock-test connect PORT MSG   connect to the host (CID 2), send MSG, print the reply
 *   vsock-test listen PORT        accept one connection, print what arrives, answer "pong:" + it
 *   vsock-test hold PORT          accept one connection, print what arrives first, then wait
 *                                 for the connection's end and say how it ended (a restore's
 *                                 transport reset: GUEST-RESET)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

static int must(int v, const char *what) {
    if (v < 0) { perror(what); exit(1); }
    return v;
}

int main(int argc, char **argv) {
    char buf[256];
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    if (argc == 4 && !strcmp(argv[1], "connect")) {
        int s = must(socket(AF_VSOCK, SOCK_STREAM, 0), "socket");
        a.svm_cid = VMADDR_CID_HOST;
        a.svm_port = atoi(argv[2]);
        must(connect(s, (struct sockaddr *)&a, sizeof a), "connect");
        must(write(s, argv[3], strlen(argv[3])), "write");
        int n = must(read(s, buf, sizeof buf - 1), "read");
        buf[n] = 0;
        printf("GUEST-GOT %s\n", buf);
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        int s = must(socket(AF_VSOCK, SOCK_STREAM, 0), "socket");
        a.svm_cid = VMADDR_CID_ANY;
        a.svm_port = atoi(argv[2]);
        must(bind(s, (struct sockaddr *)&a, sizeof a), "bind");
        must(listen(s, 1), "listen");
        printf("LISTENING %s\n", argv[2]);
        fflush(stdout);
        int c = must(accept(s, NULL, NULL), "accept");
        int n = must(read(c, buf, sizeof buf - 1), "read");
        buf[n] = 0;
        printf("GUEST-ACCEPTED %s\n", buf);
        char out[300];
        snprintf(out, sizeof out, "pong:%s", buf);
        must(write(c, out, strlen(out)), "write");
        sleep(1);
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "hold")) {
        int s = must(socket(AF_VSOCK, SOCK_STREAM, 0), "socket");
        a.svm_cid = VMADDR_CID_ANY;
        a.svm_port = atoi(argv[2]);
        must(bind(s, (struct sockaddr *)&a, sizeof a), "bind");
        must(listen(s, 1), "listen");
        printf("HOLDING %s\n", argv[2]);
        fflush(stdout);
        int c = must(accept(s, NULL, NULL), "accept");
        int n = must(read(c, buf, sizeof buf - 1), "read");
        buf[n] = 0;
        printf("GUEST-HELD %s\n", buf);
        fflush(stdout);
        for (;;) {
            n = read(c, buf, sizeof buf);
            if (n > 0) continue;
            if (n == 0) printf("GUEST-EOF\n");
            else printf("GUEST-%s\n", errno == ECONNRESET ? "RESET" : strerror(errno));
            fflush(stdout);
            return 0;
        }
    }
    fprintf(stderr, "usage: vsock-test connect PORT MSG | listen PORT | hold PORT\n");
    return 2;
}
