// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * pvshim: drive Linux's own pvcalls-front from inside a Xen guest.
 *
 * Linux builds pvcalls-front but nothing in the kernel calls its socket
 * functions: the AF_INET hook they were written for never went upstream.
 * This module is that missing caller.  It compiles pvcalls-front.c (taken
 * unmodified from the kernel source that matches the guest kernel) into the
 * same object, registers the frontend, and runs one scenario at load time,
 * the way a socket user would: SOCKET, CONNECT to an echo server in dom0,
 * 1 MiB each way checked byte for byte, BIND, LISTEN, POLL, ACCEPT of a
 * connection made by a dom0 client, an echo of that connection, RELEASE.
 *
 * Results go to the console, one line per step, for the harness in dom0:
 *
 *	PVSHIM STEP <name> BEGIN
 *	PVSHIM STEP <name> OK <details>
 *	PVSHIM STEP <name> FAIL <details>
 *	PVSHIM LISTENING port=<port>	(dom0 may connect now)
 *	PVSHIM RESULT PASS | PVSHIM RESULT FAIL <step>
 *
 * A BEGIN with nothing after it names the call that never returned: most
 * pvcalls-front calls wait for the backend's response without a timeout.
 */

#include <linux/module.h>

/*
 * pvcalls-front.c ends with module_init(pvcalls_frontend_init).  A module
 * has one init function, and ours must run after the frontend's, so the
 * frontend's module_init is disarmed while its source is compiled here and
 * pvshim_init() calls pvcalls_frontend_init() itself.  Being in the same
 * translation unit also gives the waits below the wait queues that
 * pvcalls-front wakes from its event channel handlers, which is where a
 * poll(2) on such a socket would sleep.
 */
#pragma push_macro("module_init")
#undef module_init
#define module_init(fn)
#include "pvcalls-front.c"
#pragma pop_macro("module_init")

#include <linux/delay.h>
#include <linux/in.h>
#include <linux/jiffies.h>
#include <linux/uio.h>
#include <linux/vmalloc.h>
#include <xen/xenbus.h>

static unsigned short echo_port;
module_param(echo_port, ushort, 0444);
MODULE_PARM_DESC(echo_port, "port of the echo server on dom0's 127.0.0.1");

static unsigned short listen_port;
module_param(listen_port, ushort, 0444);
MODULE_PARM_DESC(listen_port, "port to BIND and LISTEN on (dom0's 127.0.0.1)");

static unsigned int nbytes = 1 << 20;
module_param(nbytes, uint, 0444);
MODULE_PARM_DESC(nbytes, "bytes to send each way on each connection");

static unsigned int step_timeout = 60;
module_param(step_timeout, uint, 0444);
MODULE_PARM_DESC(step_timeout, "seconds one step may take before it fails");

#define SHIM_CHUNK	(32 * 1024)	/* one pvcalls data ring direction */

/* The console protocol.  pr_info so that loglevel=7 shows it. */
#define step_begin(name)	pr_info("PVSHIM STEP %s BEGIN\n", name)
#define step_ok(name, fmt, ...) \
	pr_info("PVSHIM STEP %s OK " fmt "\n", name, ##__VA_ARGS__)
#define step_fail(name, fmt, ...) \
	pr_err("PVSHIM STEP %s FAIL " fmt "\n", name, ##__VA_ARGS__)

/*
 * The stream sent on every connection: byte i depends on i through a
 * multiplicative hash, so a lost, duplicated or reordered piece of any
 * length shows as a mismatch at the first byte it displaced.
 */
static u8 pattern_byte(u64 i)
{
	return (u8)(((u32)i * 2654435761u) >> 24);
}

static void pattern_fill(u8 *buf, u64 offset, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
		buf[i] = pattern_byte(offset + i);
}

/*
 * A struct socket as pvcalls-front wants one: it keeps its per-socket state
 * in sk->sk_send_head, so the socket needs a struct sock, of the same plain
 * kind pvcalls_front_accept() allocates for the sockets it creates.
 */
static struct socket *shim_sock_alloc(bool with_sk)
{
	struct socket *sock;
	int ret;

	ret = sock_create_lite(PF_INET, SOCK_STREAM, IPPROTO_IP, &sock);
	if (ret)
		return ERR_PTR(ret);
	if (with_sk) {
		sock->sk = sk_alloc(&init_net, PF_INET, GFP_KERNEL,
				    &pvcalls_proto, 1);
		if (!sock->sk) {
			sock_release(sock);
			return ERR_PTR(-ENOMEM);
		}
	}
	return sock;
}

static void shim_sock_free(struct socket *sock)
{
	if (IS_ERR_OR_NULL(sock))
		return;
	if (sock->sk) {
		sk_free(sock->sk);
		sock->sk = NULL;
	}
	sock_release(sock);
}

static int shim_send(struct socket *sock, const void *buf, size_t len)
{
	struct msghdr msg = { .msg_flags = MSG_DONTWAIT };
	struct kvec iov = { .iov_base = (void *)buf, .iov_len = len };

	iov_iter_kvec(&msg.msg_iter, ITER_SOURCE, &iov, 1, len);
	return pvcalls_front_sendmsg(sock, &msg, len);
}

static int shim_recv(struct socket *sock, void *buf, size_t len)
{
	struct msghdr msg = { };
	struct kvec iov = { .iov_base = buf, .iov_len = len };

	iov_iter_kvec(&msg.msg_iter, ITER_DEST, &iov, 1, len);
	return pvcalls_front_recvmsg(sock, &msg, len, MSG_DONTWAIT);
}

/* Statistics of the waits of one transfer, reported with its result. */
struct shim_waits {
	unsigned int woken;	/* by pvcalls-front's event channel handler */
	unsigned int lapsed;	/* by the 200 ms re-check: a missed notify */
};

/*
 * Wait until pvcalls_front_poll() reports one of @events (or an error) on
 * an active socket, or until @deadline.  pvcalls-front wakes
 * map->active.inflight_conn_req when the backend notifies the socket's
 * event channel; the wait re-checks every 200 ms anyway so that a backend
 * that forgets to notify is counted instead of hanging the scenario.
 */
static __poll_t shim_wait_active(struct socket *sock, __poll_t events,
				 unsigned long deadline, struct shim_waits *w)
{
	struct sock_mapping *map = (struct sock_mapping *)sock->sk->sk_send_head;
	__poll_t want = events | EPOLLERR | EPOLLNVAL;
	__poll_t mask;
	long left, ret;

	for (;;) {
		mask = pvcalls_front_poll(NULL, sock, NULL);
		if (mask & want)
			return mask;
		left = (long)(deadline - jiffies);
		if (left <= 0)
			return 0;
		ret = wait_event_interruptible_timeout(
			map->active.inflight_conn_req,
			pvcalls_front_poll(NULL, sock, NULL) & want,
			min(left, (long)(HZ / 5)));
		if (ret > 0)
			w->woken++;
		else if (ret == 0 && time_before(jiffies, deadline))
			w->lapsed++;
		else if (ret < 0)
			return 0;
	}
}

/*
 * Send nbytes of the pattern and check the echo byte for byte, sending and
 * receiving together (the rings hold 32 KiB each way, so a sender that did
 * not also receive would stall on the echo server's back pressure).
 */
static int shim_echo_check(const char *step, struct socket *sock)
{
	unsigned long deadline = jiffies + step_timeout * HZ;
	struct shim_waits w = { };
	u64 tx = 0, rx = 0;
	u8 *txbuf, *rxbuf;
	int ret = -EIO;

	txbuf = vmalloc(SHIM_CHUNK);
	rxbuf = vmalloc(SHIM_CHUNK);
	if (!txbuf || !rxbuf) {
		step_fail(step, "out of memory");
		ret = -ENOMEM;
		goto out;
	}

	while (rx < nbytes) {
		__poll_t mask;
		int n;

		mask = shim_wait_active(sock, EPOLLIN |
					(tx < nbytes ? EPOLLOUT : 0),
					deadline, &w);
		if (!mask) {
			step_fail(step, "timeout tx=%llu rx=%llu woken=%u lapsed=%u",
				  tx, rx, w.woken, w.lapsed);
			goto out;
		}
		if (mask & (EPOLLERR | EPOLLNVAL)) {
			step_fail(step, "poll error mask=%#x tx=%llu rx=%llu",
				  (unsigned int)mask, tx, rx);
			goto out;
		}
		if (tx < nbytes && (mask & EPOLLOUT)) {
			size_t len = min_t(u64, SHIM_CHUNK, nbytes - tx);

			pattern_fill(txbuf, tx, len);
			n = shim_send(sock, txbuf, len);
			if (n < 0 && n != -EAGAIN) {
				step_fail(step, "sendmsg %d at tx=%llu", n, tx);
				goto out;
			}
			if (n > 0)
				tx += n;
		}
		if (mask & EPOLLIN) {
			size_t i;

			n = shim_recv(sock, rxbuf, SHIM_CHUNK);
			if (n == 0) {
				step_fail(step, "EOF at rx=%llu", rx);
				goto out;
			}
			if (n < 0 && n != -EAGAIN) {
				step_fail(step, "recvmsg %d at rx=%llu", n, rx);
				goto out;
			}
			for (i = 0; n > 0 && i < n; i++) {
				if (rxbuf[i] != pattern_byte(rx + i)) {
					step_fail(step, "mismatch at byte %llu: got %#x want %#x",
						  rx + i, rxbuf[i],
						  pattern_byte(rx + i));
					goto out;
				}
			}
			if (n > 0)
				rx += n;
			if (rx > tx) {
				step_fail(step, "received %llu bytes, sent only %llu",
					  rx, tx);
				goto out;
			}
		}
	}
	step_ok(step, "bytes=%llu woken=%u lapsed=%u", rx, w.woken, w.lapsed);
	ret = 0;
out:
	vfree(txbuf);
	vfree(rxbuf);
	return ret;
}

/*
 * Echo what the dom0 client sends until it closes (EOF), then check the
 * amount.  The client closes only after it read its whole echo, so by then
 * every byte we sent has left the ring and RELEASE loses nothing.
 */
static int shim_echo_serve(const char *step, struct socket *sock)
{
	unsigned long deadline = jiffies + step_timeout * HZ;
	struct shim_waits w = { };
	size_t pending = 0, off = 0;
	u64 total = 0;
	u8 *buf;
	int ret = -EIO;

	buf = vmalloc(SHIM_CHUNK);
	if (!buf) {
		step_fail(step, "out of memory");
		return -ENOMEM;
	}

	for (;;) {
		__poll_t mask;
		int n;

		mask = shim_wait_active(sock, pending ? EPOLLOUT : EPOLLIN,
					deadline, &w);
		if (!mask) {
			step_fail(step, "timeout echoed=%llu pending=%zu woken=%u lapsed=%u",
				  total, pending, w.woken, w.lapsed);
			goto out;
		}
		if (pending) {
			if (mask & (EPOLLERR | EPOLLNVAL)) {
				step_fail(step, "poll error mask=%#x echoed=%llu",
					  (unsigned int)mask, total);
				goto out;
			}
			n = shim_send(sock, buf + off, pending);
			if (n < 0 && n != -EAGAIN) {
				step_fail(step, "sendmsg %d", n);
				goto out;
			}
			if (n > 0) {
				off += n;
				pending -= n;
			}
			continue;
		}
		/* EPOLLERR with no data left is the peer's orderly close. */
		n = shim_recv(sock, buf, SHIM_CHUNK);
		if (n == 0)
			break;
		if (n == -EAGAIN)
			continue;
		if (n < 0) {
			step_fail(step, "recvmsg %d after %llu bytes", n, total);
			goto out;
		}
		total += n;
		pending = n;
		off = 0;
	}
	if (total != nbytes) {
		step_fail(step, "client sent %llu bytes, expected %u", total, nbytes);
		goto out;
	}
	step_ok(step, "bytes=%llu woken=%u lapsed=%u", total, w.woken, w.lapsed);
	ret = 0;
out:
	vfree(buf);
	return ret;
}

static struct sockaddr_in shim_addr(unsigned short port)
{
	struct sockaddr_in sin = {
		.sin_family = AF_INET,
		.sin_port = htons(port),
		.sin_addr.s_addr = htonl(INADDR_LOOPBACK),
	};
	return sin;
}

/*
 * pvcalls_front_probe() reads the backend's versions, max-page-order and
 * function-calls once and gives up for good if they are not there yet, so
 * the frontend is registered only once the backend is in InitWait, as a
 * xenbus frontend built into a kernel would meet it after boot.
 */
static int shim_wait_backend(void)
{
	unsigned long deadline = jiffies + step_timeout * HZ;
	unsigned long start = jiffies;
	char *backend;
	int state;

	step_begin("backend-initwait");
	for (;;) {
		backend = xenbus_read(XBT_NIL, "device/pvcalls/0", "backend", NULL);
		if (!IS_ERR(backend)) {
			state = xenbus_read_driver_state(backend);
			kfree(backend);
			if (state == XenbusStateInitWait ||
			    state == XenbusStateConnected)
				break;
		} else {
			state = -1;
		}
		if (time_after(jiffies, deadline)) {
			step_fail("backend-initwait", "backend state %d", state);
			return -ETIMEDOUT;
		}
		msleep(50);
	}
	step_ok("backend-initwait", "state=%d after %u ms", state,
		jiffies_to_msecs(jiffies - start));
	return 0;
}

static int shim_wait_connected(void)
{
	unsigned long deadline = jiffies + step_timeout * HZ;
	unsigned long start = jiffies;
	struct xenbus_device *dev;

	step_begin("connected");
	for (;;) {
		dev = READ_ONCE(pvcalls_front_dev);
		if (dev && dev->state == XenbusStateConnected)
			break;
		if (time_after(jiffies, deadline)) {
			step_fail("connected", "probed=%d frontend state=%d",
				  dev != NULL, dev ? dev->state : -1);
			return -ETIMEDOUT;
		}
		msleep(20);
	}
	step_ok("connected", "after %u ms", jiffies_to_msecs(jiffies - start));
	return 0;
}

/* One call, one step: BEGIN, the call, then OK or FAIL with its return. */
#define shim_call(name, call) ({					\
	int __ret;							\
	step_begin(name);						\
	__ret = (call);							\
	if (__ret)							\
		step_fail(name, "returned %d", __ret);			\
	else								\
		step_ok(name, "");					\
	__ret;								\
})

static const char *shim_scenario(void)
{
	struct socket *csock = NULL, *lsock = NULL, *asock = NULL;
	struct sockaddr_in sin;
	const char *failed = NULL;
	unsigned long deadline;
	__poll_t mask;
	int ret;

	/* CONNECT to dom0's echo server, 1 MiB each way. */
	csock = shim_sock_alloc(true);
	if (IS_ERR(csock)) {
		ret = PTR_ERR(csock);
		csock = NULL;
		step_fail("socket", "allocating a socket: %d", ret);
		return "socket";
	}
	if (shim_call("socket", pvcalls_front_socket(csock))) {
		failed = "socket";
		goto release;
	}
	sin = shim_addr(echo_port);
	if (shim_call("connect", pvcalls_front_connect(csock,
			(struct sockaddr *)&sin, sizeof(sin), 0))) {
		failed = "connect";
		goto release;
	}
	step_begin("echo-connect");
	if (shim_echo_check("echo-connect", csock)) {
		failed = "echo-connect";
		goto release;
	}

	/* BIND and LISTEN, POLL until dom0's client is there, ACCEPT it. */
	lsock = shim_sock_alloc(true);
	if (IS_ERR(lsock)) {
		lsock = NULL;
		failed = "socket-listen";
		goto release;
	}
	if (shim_call("socket-listen", pvcalls_front_socket(lsock))) {
		failed = "socket-listen";
		goto release;
	}
	sin = shim_addr(listen_port);
	/* pvcalls_front_bind() returns 0 whatever the backend said; LISTEN tells. */
	if (shim_call("bind", pvcalls_front_bind(lsock,
			(struct sockaddr *)&sin, sizeof(sin)))) {
		failed = "bind";
		goto release;
	}
	if (shim_call("listen", pvcalls_front_listen(lsock, 1))) {
		failed = "listen";
		goto release;
	}
	pr_info("PVSHIM LISTENING port=%u\n", listen_port);

	step_begin("poll");
	deadline = jiffies + step_timeout * HZ;
	mask = pvcalls_front_poll(NULL, lsock, NULL);
	if (!(mask & EPOLLIN)) {
		struct pvcalls_bedata *bedata =
			dev_get_drvdata(&pvcalls_front_dev->dev);

		/* The first call sent PVCALLS_POLL; its response wakes this. */
		ret = wait_event_interruptible_timeout(bedata->inflight_req,
			(mask = pvcalls_front_poll(NULL, lsock, NULL)) & EPOLLIN,
			(long)(deadline - jiffies));
		if (ret <= 0) {
			step_fail("poll", "no connection reported (mask=%#x)",
				  (unsigned int)mask);
			failed = "poll";
			goto release;
		}
	}
	step_ok("poll", "mask=%#x", (unsigned int)mask);

	asock = shim_sock_alloc(false);
	if (IS_ERR(asock)) {
		asock = NULL;
		failed = "accept";
		goto release;
	}
	if (shim_call("accept", pvcalls_front_accept(lsock, asock, 0))) {
		/* pvcalls-front gave asock a struct sock; it is freed below. */
		failed = "accept";
		goto release;
	}
	step_begin("echo-accept");
	if (shim_echo_serve("echo-accept", asock))
		failed = "echo-accept";

release:
	/*
	 * RELEASE every socket the backend knows, even after a failure, so
	 * that dom0 can still check that the backend let go of everything.
	 */
	if (asock && asock->sk && asock->sk->sk_send_head &&
	    shim_call("release-accepted", pvcalls_front_release(asock)) && !failed)
		failed = "release-accepted";
	if (lsock && lsock->sk->sk_send_head &&
	    shim_call("release-listen", pvcalls_front_release(lsock)) && !failed)
		failed = "release-listen";
	if (csock && csock->sk->sk_send_head &&
	    shim_call("release-connect", pvcalls_front_release(csock)) && !failed)
		failed = "release-connect";
	shim_sock_free(asock);
	shim_sock_free(lsock);
	shim_sock_free(csock);
	return failed;
}

static int __init pvshim_init(void)
{
	const char *failed;
	int ret;

	pr_info("PVSHIM START echo_port=%u listen_port=%u nbytes=%u\n",
		echo_port, listen_port, nbytes);
	if (shim_wait_backend()) {
		failed = "backend-initwait";
		goto out;
	}
	ret = pvcalls_frontend_init();
	if (ret) {
		step_fail("register", "xenbus_register_frontend: %d", ret);
		failed = "register";
		goto out;
	}
	if (shim_wait_connected()) {
		failed = "connected";
		goto out;
	}
	failed = shim_scenario();
out:
	if (failed)
		pr_err("PVSHIM RESULT FAIL %s\n", failed);
	else
		pr_info("PVSHIM RESULT PASS\n");
	/*
	 * Stay loaded either way: the frontend driver is registered and has
	 * no exit path (pvcalls-front has no module_exit).
	 */
	return 0;
}
module_init(pvshim_init);
