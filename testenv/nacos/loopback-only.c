/*
 * loopback-only.so: an LD_PRELOAD shim that keeps the test environment's Nacos server on
 * 127.0.0.1, listening and talking.
 *
 * Listening: Nacos 2.x binds its gRPC servers (client port P+1000, cluster port P+1001)
 * and its JRaft server (P-1000) to the wildcard address and has no setting to change that
 * (3.x added one). bind() to 0.0.0.0 becomes a bind to 127.0.0.1, bind() to :: one to
 * ::ffff:127.0.0.1 (a dual-stack socket, as Java opens them, then accepts IPv4
 * connections to 127.0.0.1 only).
 *
 * Talking: Nacos health-checks persistent instances by connecting to their address (TCP
 * by default, or HTTP), and test data uses documentation addresses (192.0.2.0/24 ...)
 * that must never be contacted. connect(), sendto() and sendmsg() towards an IPv4 or IPv6
 * address outside the loopback range fail at once with ENETUNREACH, as for a host that
 * cannot be reached: the check fails and Nacos marks the instance unhealthy, without a
 * packet leaving the machine.
 *
 * Everything else (AF_UNIX, loopback, explicit bind addresses) passes through untouched.
 * Nacos itself is not modified.
 *
 * Built by scripts/testenv install nacos:
 *   cc -shared -fPIC -O2 -o loopback-only.so loopback-only.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

static void *next_symbol(const char *name)
{
	return dlsym(RTLD_NEXT, name);
}

/* in4_is_local: 127.0.0.0/8, or 0.0.0.0 (which Linux takes as this host). */
static int in4_is_local(uint32_t addr_be)
{
	uint32_t a = ntohl(addr_be);

	return (a >> 24) == 127 || a == INADDR_ANY;
}

/* is_local: whether a destination may be contacted; non-IP families always may. */
static int is_local(const struct sockaddr *addr, socklen_t len)
{
	if (!addr)
		return 1;
	if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
		struct sockaddr_in in4;

		memcpy(&in4, addr, sizeof in4);
		return in4_is_local(in4.sin_addr.s_addr);
	}
	if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
		struct sockaddr_in6 in6;
		uint32_t v4;

		memcpy(&in6, addr, sizeof in6);
		if (IN6_IS_ADDR_LOOPBACK(&in6.sin6_addr) || IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr))
			return 1;
		if (IN6_IS_ADDR_V4MAPPED(&in6.sin6_addr)) {
			memcpy(&v4, &in6.sin6_addr.s6_addr[12], sizeof v4);
			return in4_is_local(v4);
		}
		return 0;
	}
	return 1;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
	static int (*real)(int, const struct sockaddr *, socklen_t);

	if (!real && !(real = (int (*)(int, const struct sockaddr *, socklen_t))next_symbol("bind"))) {
		errno = ENOSYS;
		return -1;
	}
	if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
		struct sockaddr_in in4;

		memcpy(&in4, addr, sizeof in4);
		if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) {
			in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
			return real(fd, (const struct sockaddr *)&in4, sizeof in4);
		}
	} else if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
		struct sockaddr_in6 in6;

		memcpy(&in6, addr, sizeof in6);
		if (IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr)) {
			memset(&in6.sin6_addr, 0, sizeof in6.sin6_addr);
			in6.sin6_addr.s6_addr[10] = 0xff;
			in6.sin6_addr.s6_addr[11] = 0xff;
			in6.sin6_addr.s6_addr[12] = 127;
			in6.sin6_addr.s6_addr[15] = 1;
			return real(fd, (const struct sockaddr *)&in6, sizeof in6);
		}
	}
	return real(fd, addr, len);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	static int (*real)(int, const struct sockaddr *, socklen_t);

	if (!real && !(real = (int (*)(int, const struct sockaddr *, socklen_t))next_symbol("connect"))) {
		errno = ENOSYS;
		return -1;
	}
	if (!is_local(addr, len)) {
		errno = ENETUNREACH;
		return -1;
	}
	return real(fd, addr, len);
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr, socklen_t len)
{
	static ssize_t (*real)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);

	if (!real &&
	    !(real = (ssize_t(*)(int, const void *, size_t, int, const struct sockaddr *, socklen_t))next_symbol("sendto"))) {
		errno = ENOSYS;
		return -1;
	}
	if (!is_local(addr, len)) {
		errno = ENETUNREACH;
		return -1;
	}
	return real(fd, buf, n, flags, addr, len);
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
	static ssize_t (*real)(int, const struct msghdr *, int);

	if (!real && !(real = (ssize_t(*)(int, const struct msghdr *, int))next_symbol("sendmsg"))) {
		errno = ENOSYS;
		return -1;
	}
	if (msg && !is_local((const struct sockaddr *)msg->msg_name, msg->msg_namelen)) {
		errno = ENETUNREACH;
		return -1;
	}
	return real(fd, msg, flags);
}
